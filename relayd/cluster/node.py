"""One gateway's part in the regional service: leases carried out, output shipped, switches heard.

`ClusterNode` is the I/O side of `ownership.py`: every ``lease_ttl / 3`` it
reads the round's state from Redis in one round trip (`ClusterStore.observe`),
asks `ownership.plan` what to do and does it: a claimed VM gets a hub (its
port opened, its ring started from the shared log's tail), a lost or released
VM's hub is stopped at once (its port closed, its sessions told to come back).
It also keeps every owned VM's console output flowing into the VM's Redis
stream (`Outbox`, one shared appender task, fenced by the lease's token) and
mirrors the console switches that any gateway sets.

Redis trouble never breaks what works: a failed round closes no port it did not
close before failing (ports stay open, sessions go on; only the owner map follows
what it did, `_note_ports`), output waits in each outbox (bounded by
`console_log_bytes`; what overflows becomes a recorded gap), and when Redis
answers again the holders re-assert their leases first (`grace`), so no VM
changes owner because of an outage. A gateway that was frozen (SIGSTOP) for
longer than a lease notices on its next round (`stalled`) and closes every
port it held whose lease is gone or another's, or every one if Redis does not
answer that round: by then another gateway may own them. Until that round, its
hubs write no client input (`ConsoleHub.lease_expiry`): each renewal says how
long its lease lasts by the local clock (a lease from when the renewal was
sent), and input that arrives after that (keys typed during the freeze) waits
for a round that renews the lease, or is dropped with the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..config import VmConfig
from ..errors import PeerLinkError
from ..hub import ConsoleHub
from ..log import get_logger
from ..switches import LEVELS, ConsoleSwitches, Level
from . import peerview
from .ownership import Claim, Decision, Lease, Lost, Nothing, OwnershipPolicy, Release, Renew
from .store import (
    AppendResult,
    ClusterStore,
    ClusterUnavailableError,
    Outgoing,
    Override,
    OwnershipNews,
    RoundState,
    SwitchChange,
    SwitchesRead,
    SwitchesResync,
    SwitchEvent,
    vms_digest,
)

log = get_logger("relayd.cluster")

PeerView = peerview.PeerView
#: Ask the gateway at an advertise address about some VMs (one `peerview` question).
AskPeer = Callable[[str, Sequence[str]], Awaitable[PeerView]]

APPEND_COALESCE = 0.025
#: How long a gateway remembers where a VM it handed over left its offsets, in lease
#: periods: the next owner claims it within a few, and re-reserves past it itself.
HANDED_OVER_KEEP_LEASES = 10
APPEND_RETRY_MIN = 0.1
APPEND_RETRY_MAX = 1.0
#: Console output sent to Redis in one round trip, at most (beyond one VM's batch):
#: when many VMs print at full speed, their outboxes together hold tens of MiB, and
#: one pipeline of all of it came back after the store's deadline on a busy host,
#: which reads as Redis being down. The rest goes in the next round trip.
APPEND_ROUND_TRIP_BYTES = 4 << 20
ERROR_LOG_INTERVAL = 30.0
#: How long a hand-over waits for the ports it closed to be gone (a link's close gives
#: up flushing after 2 s: ports/stream.py's CLOSE_TIMEOUT).
PORT_CLOSE_WAIT = 2.5
#: The least time between the starts of two rounds: news of claims and releases from
#: other gateways runs a round early (`OwnershipNews`), but never back to back.
ROUND_MIN_GAP = 0.05


def _release_reason(release: Release, *, leaving: bool) -> str:
    """What the sessions of a VM handed over are told (and the log says)."""
    if leaving:
        return "gateway shutting down"
    if release.to is None:
        return "the console was removed from the configuration"
    return "the console moved to another gateway"


def _reraise_cancellation() -> None:
    """Honour a cancellation that a Redis deadline turned into an error.

    On Python 3.11, a task cancelled just as an `asyncio.timeout` expires can see
    `TimeoutError` instead of `CancelledError` (fixed in 3.12); the store turns
    that into `ClusterUnavailableError`, and a retry loop would then never stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class NodeOwner(Protocol):
    """What the node needs of its gateway."""

    def configured_vms(self) -> Mapping[str, VmConfig]:
        """Every VM of the region's configuration, by id."""

    def open_hub(self, vm: VmConfig, history: tuple[int, bytes], sink: Outbox) -> ConsoleHub:
        """Start a hub for a VM this gateway now owns (its port opens)."""

    def close_hub(self, vm_id: str, reason: str) -> asyncio.Future[None] | None:
        """Stop an owned VM's hub at once: close its port, end its sessions.

        Returns what finishes once the port is closed (None: it is already).
        """

    def switches_changed(self, change: SwitchChange | None = None) -> None:
        """Switch overrides changed (`change`, or None: re-read): end sessions of consoles
        now disabled."""

    def owners_changed(self, vms: Collection[str]) -> None:
        """The region named another owner for these VMs (sessions relayed to the old one move)."""


class Outbox:
    """An owned VM's console output on its way to the shared log (the hub's `LogSink`).

    `append` only buffers and wakes the appender; what is buffered is bounded
    by `limit` bytes: the oldest chunks go first, and the log records the hole
    as a gap when the rest arrives.
    """

    def __init__(
        self,
        vm: str,
        token: int,
        limit: int,
        wake: Callable[[], None],
        start: int = 0,
        stats: NodeStats | None = None,
        stalled: Callable[[], bool] | None = None,
    ) -> None:
        """Args:
        stats: where output let go of past `limit` is counted.
        stalled: whether this gateway has not run a round for longer than a lease
            (frozen): then output is held (`hold`) until a round renews the lease.
        """
        self.vm = vm
        self.token = token
        self.end = start  # the offset after the last byte handed out (clients know it)
        self.limit = limit
        self.chunks: deque[tuple[int, bytes]] = deque()
        self.size = 0
        self.ahead = 0  # how far past `end` the last `mark` reached
        self._wake = wake
        self._stats = stats  # where what the buffer lets go of is counted
        # The output rate is measured from here: (when, `end` then), and when the first
        # byte after it was handed out (an idle VM that starts printing is fast at once).
        self._measured = (time.monotonic(), start)
        self._first_since: float | None = None
        self._stalled = stalled
        self.held: list[bytes] | None = None  # output kept from everyone (see `hold`)
        self.publish: Callable[[bytes], None] | None = None  # the hub's, for `release`

    def hold(self, data: bytes) -> bool:
        """Keep output from clients while this gateway may have slept through its lease.

        Frozen (SIGSTOP) past its lease, an owner wakes with the VM's output piled up
        in the port's socket, and reads it before its round learns that another gateway
        took the VM, from this owner's reservation mark on: handed out, the pile would
        take offsets the new owner gives other bytes. Held, it waits for the round:
        `release` when the lease was renewed, dropped with the outbox when it is lost.
        """
        if self.held is None:
            if self._stalled is None or not self._stalled():
                return False
            self.held = []
            log.warning("cluster_output_held", vm=self.vm, reason="no round for a lease period")
        self.held.append(data)
        return True

    def release(self) -> None:
        """The lease was renewed after a stall: hand out what `hold` kept, in order."""
        held, self.held = self.held, None
        if held and self.publish is not None:
            for data in held:
                self.publish(data)

    def append(self, offset: int, data: bytes) -> None:
        """Buffer output that starts at `offset` (called by the hub, never waits)."""
        if self._first_since is None:
            self._first_since = time.monotonic()
        self.chunks.append((offset, data))
        self.size += len(data)
        self.end = offset + len(data)
        while self.size > self.limit and len(self.chunks) > 1:
            _, old = self.chunks.popleft()
            self.size -= len(old)
            if self._stats is not None:
                self._stats.dropped_bytes += len(old)
        self._wake()

    def mark(self, horizon: float, least: int) -> int:
        """The offset to reserve up to with the next append: past every offset handed
        out, by what this VM may print in `horizon` seconds at its recent rate (at
        least `least`). The append stores the mark only once it lands, and the owner
        goes on handing out offsets meanwhile: were the mark a fixed distance ahead, a
        VM printing faster than that distance per round trip would outrun it, and a
        successor after this gateway's death would reuse offsets clients hold.
        """
        now = time.monotonic()
        since, measured_end = self._measured
        if self._first_since is not None:
            since = max(since, self._first_since)
        rate = (self.end - measured_end) / max(now - since, APPEND_COALESCE)
        self._measured, self._first_since = (now, self.end), None
        # Slow to shrink: one quiet round trip in a flood does not bring the mark close.
        self.ahead = max(least, int(rate * horizon), self.ahead // 2)
        return self.end + self.ahead

    def batch(self) -> tuple[int, list[bytes]] | None:
        """What to send now: the first offset and the contiguous chunks from it."""
        if not self.chunks:
            return None
        start, first = self.chunks[0]
        out, end = [first], start + len(first)
        for offset, data in itertools.islice(self.chunks, 1, None):
            if offset != end:
                break  # a hole (dropped while Redis was away): the next batch starts after it
            out.append(data)
            end += len(data)
        return start, out

    def stored(self, end: int) -> None:
        """The shared log holds everything before `end`: forget it."""
        while self.chunks:
            offset, data = self.chunks[0]
            if offset + len(data) <= end:
                self.chunks.popleft()
                self.size -= len(data)
            elif offset < end:
                self.chunks[0] = (end, data[end - offset :])
                self.size -= end - offset
                break
            else:
                break


MAX_LINK_PEERS = 64
"""Peer gateways counted apart in `NodeStats.peer_link_failures`."""


@dataclass
class NodeStats:
    """Counters for /metrics."""

    redis_errors: int = 0
    rounds: int = 0
    renew_seconds: float = 0.0  # the last round's round trip
    appended_bytes: int = 0
    fenced_appends: int = 0
    owner_changes: int = 0
    news_rounds: int = 0  # rounds run early because another gateway claimed or released
    deposed_by_peers: int = 0  # ports let go, cut off from Redis, on a peer's reading of it
    unstored_bytes: int = 0  # console output given up on: Redis did not take it before leaving
    dropped_bytes: int = 0  # console output an outbox let go of, full while Redis was away
    errors_by_call: dict[str, int] = field(default_factory=dict)
    # Peer links that could not be opened, by the gateway they were to (relays, moves, and
    # questions while cut off from Redis). Bounded: ids beyond MAX_LINK_PEERS are "other".
    peer_link_failures: dict[str, int] = field(default_factory=dict)


class ClusterNode:
    """Runs the ownership rounds, the log appender and the switch watcher of one gateway."""

    def __init__(
        self,
        owner: NodeOwner,
        store: ClusterStore,
        *,
        gateway_id: str,
        advertise: str,
        lease_ttl: float,
        ring_bytes: int,
        log_bytes: int,
        backup: ConsoleSwitches | None = None,
        ask_peer: AskPeer | None = None,
    ) -> None:
        """Args:
        backup: a local copy of the region's switch overrides (the state file), kept
            up to date and written back to Redis if Redis comes back without them,
            so a console an owner turned off never comes back on by itself.
        ask_peer: how to ask another gateway what Redis told it (peerview.py), for
            when this gateway alone is cut off from Redis; None: never asked.
        """
        self.owner = owner
        self.backup = backup
        self.store = store
        self.gateway_id = gateway_id
        self.advertise = advertise
        self.lease_ttl = lease_ttl
        self.ring_bytes = ring_bytes
        self.log_bytes = log_bytes
        self.held: dict[str, int] = {}
        self.outboxes: dict[str, Outbox] = {}
        self._hubs: dict[str, ConsoleHub] = {}  # of the held VMs: told when leases lapse
        # Where each VM is owned, as of the last round: vm -> (gateway, advertise address),
        # and the fencing token of that owner's lease (absent when a peer named the owner).
        self.owners: dict[str, tuple[str, str]] = {}
        self.fences: dict[str, int] = {}
        # The IP addresses the region's live gateways advertise, as of the last round:
        # their peer links are not clients' connections (see `Gateway.is_gateway_address`).
        self.gateway_addresses: frozenset[str] = frozenset()
        self.switches: dict[str, dict[str, bool]] = {}
        self.switch_times: dict[str, dict[str, int]] = {}  # each override's last change
        self.redis_up = False
        self.switches_loaded = False
        # Ever loaded (`switches_loaded` turns False again while Redis is away): see `state_read`.
        self._switches_read = False
        self._switches_dataset: str | None = None  # Redis's dataset id at the last read
        self._switches_lost = False  # a round saw Redis lose its data since the last read
        self._resync = asyncio.Event()
        self.first_round = asyncio.Event()
        self._rounds_seen = asyncio.Condition()
        self.stats = NodeStats()
        self.policy = OwnershipPolicy(gateway_id, lease_ttl)
        self._dataset: str | None = None
        # Redis lost the log's marks and ours are not back yet: owed until a round puts
        # them back, so a round that fails on its way does not forget them.
        self._marks_owed = False
        # VMs handed over lately: vm -> (the offset past all we handed out, when, loop
        # time). Until another gateway holds the VM, only this gateway knows that mark
        # if Redis loses it (`_reserve_again`).
        self._handed_over: dict[str, tuple[int, float]] = {}
        self._down_since: float | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._next_round_now = asyncio.Event()
        # Kept by `run`: the output path asks the time per chunk (`_stalled_now`), and on
        # 3.11 every get_running_loop() is a getpid() syscall.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.leaving = False  # draining: hand everything over, claim nothing (see `leave_soon`)
        self._heartbeat_dropped = False
        self._heard_news = False
        # VMs whose hand-over began (port closed) and is not finished: vm -> (token,
        # its outbox). A stop can cut a round short between the two; `_leave` finishes.
        self._releasing: dict[str, tuple[int, Outbox | None]] = {}
        self._ports_closing: dict[str, asyncio.Future[None]] = {}  # of those hand-overs
        self._error_logged = 0.0
        self._ship_turn = 0  # where the next round trip of console output starts
        self._digest_of: Mapping[str, VmConfig] | None = None
        self._digest = ""
        # How long output may go on before an append's mark is stored: this call's
        # deadline, the pause before the next, and its deadline (beyond: Redis is down).
        self._mark_horizon = 2 * store.timeout + APPEND_COALESCE
        self._ask_peer = ask_peer
        # When the last round that read Redis began (loop time), and the gateways it saw;
        # when the last round that may have renewed or claimed leases ended.
        self._last_read: float | None = None
        self._leases_written: float | None = None
        self._live: dict[str, str] = {}
        self._peer_error_logged = -ERROR_LOG_INTERVAL

    # -- what the gateway asks --------------------------------------------------------------

    def owner_of(self, vm_id: str) -> tuple[str, str] | None:
        """(gateway id, advertise address) of the VM's owner, None while nobody owns it."""
        return self.owners.get(vm_id)

    def fence_of(self, vm_id: str) -> int | None:
        """The fencing token of the owner's lease on the VM, as of the last round (None:
        unknown). A gateway that lost a VM and took it back holds it under a new one."""
        return self.fences.get(vm_id)

    def view_for_peer(self, vms: Iterable[str]) -> dict[str, object]:
        """What the last round read from Redis about `vms`, for a peer cut off from it."""
        seen_ago = None
        if self._last_read is not None:
            seen_ago = asyncio.get_running_loop().time() - self._last_read
        return peerview.encode_answer(self.gateway_id, seen_ago, self._live, self.owners, vms)

    @property
    def state_read(self) -> bool:
        """Whether this gateway has read the region once: the switches and one round.

        Until then it refuses every console (it knows no switch, owns no VM and knows no
        owner), so it must not look ready. Never False again: a later Redis outage is
        every gateway's, and making them all unready would take every console away.
        """
        return self._switches_read and self.first_round.is_set()

    def get(self, level: str, key: str) -> bool | None:
        """A switch override as the region has it (None: the config's default applies)."""
        return self.switches.get(level, {}).get(key)

    async def load_switches(self) -> None:
        """Read every switch override (before serving, and after each resubscription),
        and put back what the region lost of what this gateway knew.

        Raises:
            ClusterUnavailableError: Redis did not answer.
        """
        read = await self.store.read_switches()
        if self._switches_read:
            # Running: Redis lost its data (overrides included) since the last read when
            # the dataset is another, or gone until a heartbeat sets a new one.
            lost = self._switches_lost or (
                self._switches_dataset is not None and read.dataset != self._switches_dataset
            )
            known, known_times = self.switches, self.switch_times
        else:
            # Starting: this gateway's copy, which may be weeks old; its timed overrides
            # yield to any later change, so only the untimed ones need an empty region.
            lost = not any(read.switches.values())
            known, known_times = self._backed_up()
        if any(known.values()):
            read = await self._write_back(known, known_times, read, untimed_too=lost)
        self._switches_dataset, self._switches_lost = read.dataset, False
        switches: dict[str, dict[str, bool]] = {
            level: dict(values) for level, values in read.switches.items()
        }
        times: dict[str, dict[str, int]] = {
            level: dict(values) for level, values in read.times.items()
        }
        # A change the watcher heard while this read was on its way is newer than it.
        for level, heard in self.switch_times.items():
            for key, at in heard.items():
                if at > times.get(level, {}).get(key, 0) and key in self.switches.get(level, {}):
                    switches.setdefault(level, {})[key] = self.switches[level][key]
                    times.setdefault(level, {})[key] = at
        self.switches, self.switch_times = switches, times
        self.switches_loaded = self._switches_read = True
        self._back_up()

    async def _write_back(
        self,
        known: Mapping[str, Mapping[str, bool]],
        times: Mapping[str, Mapping[str, int]],
        read: SwitchesRead,
        *,
        untimed_too: bool,
    ) -> SwitchesRead:
        """Put back the overrides the region lacks or holds an older change of.

        Each gateway puts back what it knew, and one may have missed a change (its
        watcher was down), so the first to write must not decide for all: each override
        is written only where it is the later change (`ClusterStore.restore_switches`),
        and every gateway ends with the same region whatever the order. An override
        without a time (from a release before them) is put back only when the region
        lost its data (`untimed_too`), and then a disabled one wins a tie. A region the
        same as this gateway's view costs no write. Returns the region as it then is.

        Raises:
            ClusterUnavailableError: Redis did not answer.
        """
        overrides = []
        for level in LEVELS:
            have, had = read.switches.get(level, {}), read.times.get(level, {})
            for key, enabled in known.get(level, {}).items():
                at = times.get(level, {}).get(key, 0)
                if not at and not untimed_too:
                    continue
                theirs, their_at = have.get(key), had.get(key, 0)
                # As the script decides: also a same value with an older time, or a
                # third gateway's change between the two times would wrongly win.
                if theirs is None or at > their_at or (at == their_at and theirs and not enabled):
                    overrides.append(Override(level, key, enabled, at))
        if not overrides:
            return read
        written = await self.store.restore_switches(overrides)
        if written:
            log.warning("cluster_switches_restored", count=written)
        return await self.store.read_switches()

    def _backed_up(self) -> tuple[dict[str, dict[str, bool]], dict[str, dict[str, int]]]:
        if self.backup is None:
            return {}, {}
        return self.backup.snapshot(), self.backup.times()

    def _back_up(self) -> None:
        """Keep the local copy of the overrides (best effort: Redis holds the truth)."""
        if self.backup is None:
            return
        try:
            self.backup.replace(self.switches, self.switch_times)
        except OSError as exc:
            log.warning("cluster_switch_backup_failed", error=str(exc))

    async def set_switch(self, level: Level, key: str, enabled: bool) -> None:
        """Persist an override in Redis, announce it, and apply it here at once.

        Raises:
            ClusterUnavailableError: Redis did not take it (nothing changed).
        """
        at = await self.store.set_switch(level, key, enabled)
        self.switches.setdefault(level, {})[key] = enabled
        self.switch_times.setdefault(level, {})[key] = at
        self._back_up()

    # -- the tasks --------------------------------------------------------------------------

    async def run(self) -> None:
        """Rounds, appends and switch changes until `stop()`; then leave the region."""
        self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._rounds(), name="cluster-rounds"),
                    tg.create_task(self._appender(), name="cluster-appender"),
                    tg.create_task(
                        self.store.watch_switches(self._on_switch), name="cluster-switches"
                    ),
                    tg.create_task(self._resync_switches(), name="cluster-switch-resync"),
                ]
                await self._stopping.wait()
                for task in tasks:
                    task.cancel()
                # Each loop also checks `_stopping` when woken: on 3.11 a cancellation that
                # meets a Redis deadline can be lost (see `_reraise_cancellation`).
                self._wake.set()
                self._resync.set()
        finally:
            await self._leave()

    def stop(self) -> None:
        """Begin leaving: the loops end, then output is shipped and leases released."""
        self._stopping.set()

    def leave_soon(self) -> None:
        """The gateway drains: hand every VM to the other gateways now, keep watching.

        Its heartbeat goes first, so the others leave it out of every ranking, then
        each held VM is handed over (port closed, output shipped, lease released) and
        claimed by its next owner in that gateway's next round. Its sessions follow
        (relayed ones by their relaying gateway, direct ones through this one) while
        the drain waits for its clients; `stop` ends the node when the drain is over.
        With no other gateway live it keeps its VMs until then.
        """
        if not self.leaving:
            self.leaving = True
            log.info("cluster_leaving", vms=len(self.held))
            self._next_round_now.set()

    async def _leave(self) -> None:
        """A clean stop: ship what output is left, release our leases, drop the heartbeat.

        Redis errors are retried until the deadline: a deploy during a Redis blip would
        otherwise lose the output held for Redis, and leave its leases to lapse.
        """
        self._begin_hand_over(dict(self.held), "gateway shutting down")
        delay = APPEND_RETRY_MIN
        error = ""
        try:
            async with asyncio.timeout(3 * self.store.timeout + 0.5):
                while True:
                    try:
                        if self._releasing:  # ours, and any a stop or an error cut short
                            await self._finish_releases()
                        await self.store.leave()
                        await self._announce()  # the others re-rank without us now
                        return
                    except ClusterUnavailableError as exc:
                        _reraise_cancellation()
                        error = str(exc)
                    await asyncio.sleep(delay)
                    delay = min(APPEND_RETRY_MAX, delay * 2)
        except TimeoutError:
            log.warning("cluster_leave_incomplete", error=error or "timed out")
            self._unstored_output_lost()

    def _unstored_output_lost(self) -> None:
        """Say what console output leaving gives up on (Redis never took it), per VM.

        It cannot be stored any more, but it must not vanish silently: an error event
        per VM with the byte count and offsets (never the bytes), and a counter. The
        offsets stay below this owner's reservation, so the next owner announces them
        as a gap to clients that saw them, rather than reusing them.
        """
        boxes = {vm: box for vm, (_, box) in self._releasing.items() if box is not None}
        boxes.update(self.outboxes)
        for _, box in sorted(boxes.items()):
            self._not_stored(box, "Redis did not answer before the gateway left")

    def _not_stored(self, box: Outbox, reason: str) -> None:
        """Give up on what `box` holds, saying so (see `_unstored_output_lost`)."""
        if not box.chunks:
            return
        self.stats.unstored_bytes += box.size
        log.error(
            "cluster_output_not_stored",
            vm=box.vm,
            bytes=box.size,
            offsets=[box.chunks[0][0], box.end],
            reason=reason,
        )
        box.stored(box.end)

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.lease_ttl / 3
        while not self._stopping.is_set():
            started = loop.time()
            if self._next_round_now.is_set() and self._heard_news:
                self.stats.news_rounds += 1
            self._heard_news = False
            self._next_round_now.clear()
            await self.round()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, period - (loop.time() - started))):
                    await self._next_round_now.wait()
            await asyncio.sleep(max(0.0, started + ROUND_MIN_GAP - loop.time()))

    async def round(self) -> None:
        """One ownership round: observe, decide, carry out (an error stops it where it is)."""
        now = asyncio.get_running_loop().time()
        vms = self.owner.configured_vms()
        state: RoundState | None = None
        try:
            leaving = self.leaving
            if leaving and not self._heartbeat_dropped:
                await self.store.leave()
                self._heartbeat_dropped = True
            began = time.perf_counter()
            state = await self.store.observe(
                self.advertise, vms, heartbeat=not leaving, vms_digest=self._vms_digest(vms)
            )
            self.stats.renew_seconds = time.perf_counter() - began
            data_lost = self._dataset is not None and state.dataset != self._dataset
            if data_lost:
                log.warning("cluster_redis_data_lost")
                self._switches_lost = True
                self._resync.set()  # the switch overrides are written back (`load_switches`)
                self._marks_owed = True
            self._dataset = state.dataset
            self._redis_answered(now)
            self._last_read, self._live = now, state.live
            # A round over thousands of VMs is milliseconds of Python: typing on this
            # gateway waits for it in pieces, between reading, deciding and writing.
            await asyncio.sleep(0)
            decisions = self.policy.decide(
                now,
                state.live,
                state.holders,
                dict(self.held),
                data_lost=data_lost,
                leaving=leaving,
                vm_lists=state.vm_lists,
            )
            for vm_id, gateway_id in self.policy.not_taken:
                log.warning(
                    "cluster_vm_not_taken",
                    vm=vm_id,
                    gateway=gateway_id,
                    hint="the VM is not in that gateway's config? every gateway of a region "
                    "needs the same [[vms]]; this gateway keeps it meanwhile",
                )
            self.policy.not_taken.clear()
            await asyncio.sleep(0)
            try:
                await self._carry_out(decisions)
            finally:
                # Every lease write of this round has run in Redis (or never will) by now.
                self._leases_written = asyncio.get_running_loop().time()
            self._note_owners(state.holders, state.live)
            self.stats.rounds += 1
            self.first_round.set()
        except ClusterUnavailableError as exc:
            _reraise_cancellation()
            if self.held and self.policy.stalled(now):
                # Frozen for longer than a lease, and Redis does not answer now: another
                # gateway may hold our leases already. Let go of the ports without asking,
                # rather than hold them (and type into them) until Redis is back.
                log.warning("cluster_stalled_ports_closed", vms=len(self.held))
                for vm_id in list(self.held):
                    self._drop(vm_id, "this gateway no longer owns the console")
            else:
                # Redis is away but this gateway ran on time: it keeps its ports and their
                # input flows (issue 16, point 7: a shared outage changes nothing). Cut off
                # alone, it is deposed by its peers' answer instead (`_ask_region`).
                self._lease_renewed(self.held, now + self.lease_ttl)
            # The round may have opened or closed ports before it failed (a claim's hub
            # opened, then the next claim's read timed out): route by them now, not by the
            # last round that finished, which may name a gateway that no longer holds them.
            self._note_ports(state)
            self.policy.failed(now)
            self._redis_failed("round", exc, now)
            await self._ask_region(now)
        async with self._rounds_seen:
            self._rounds_seen.notify_all()

    def _stalled_now(self) -> bool:
        """Whether the last round ran more than a lease ago (see `Outbox.hold`); a
        stall also asks for a round at once."""
        stalled = self.policy.stalled((self._loop or asyncio.get_running_loop()).time())
        if stalled:
            self._next_round_now.set()
        return stalled

    def _vms_digest(self, vms: Mapping[str, VmConfig]) -> str:
        """The configured VM ids' digest, computed again only when the config changed."""
        if self._digest_of is not vms:
            self._digest_of, self._digest = vms, vms_digest(vms)
        return self._digest

    def link_failed(self, gateway: str) -> None:
        """Count a peer link to `gateway` that could not be opened (`NodeStats`)."""
        failures = self.stats.peer_link_failures
        if gateway not in failures and len(failures) >= MAX_LINK_PEERS:
            gateway = "other"  # ids come from Redis: whoever writes it must not grow this
        failures[gateway] = failures.get(gateway, 0) + 1

    async def next_round(self) -> None:
        """Wait until the next round has run (for tools and tests that watch ownership)."""
        async with self._rounds_seen:
            await self._rounds_seen.wait()

    def _redis_answered(self, now: float) -> None:
        if self._down_since is not None:
            log.info("cluster_redis_back", outage_seconds=round(now - self._down_since, 2))
            self._down_since = None
            self._wake.set()  # ship what waited
        self.redis_up = True

    def _redis_failed(self, call: str, exc: ClusterUnavailableError, now: float) -> None:
        self.stats.redis_errors += 1
        self.stats.errors_by_call[call] = self.stats.errors_by_call.get(call, 0) + 1
        if self._down_since is None:
            self._down_since = now
        self.redis_up = False
        self.switches_loaded = False
        if now - self._error_logged >= ERROR_LOG_INTERVAL:
            self._error_logged = now
            log.error("cluster_redis_unavailable", call=call, error=str(exc))

    async def _ask_region(self, now: float) -> None:
        """Cut off from Redis while our leases have surely lapsed: ask the other gateways
        whether one of them read Redis since, and let go of every port it says another
        gateway now owns (see peerview.py). A shared outage changes nothing: then no
        peer has read Redis since, and we keep every port, as point 7 of the contract
        asks."""
        written = self._leases_written
        if self._ask_peer is None or written is None or not self.held:
            return
        lapsed = written + self.lease_ttl  # our last renewal's lease, gone from Redis
        peers = {gw: addr for gw, addr in self._live.items() if gw != self.gateway_id}
        if now < lapsed or not peers:
            return
        vms = sorted(self.held)
        asked = asyncio.get_running_loop().time()
        answers = await asyncio.gather(
            *(self._ask_one(gw, addr, vms) for gw, addr in sorted(peers.items()))
        )
        # The peer read Redis at least `seen_ago` before it answered, and it answered
        # after we asked: the reading is after `asked - seen_ago`.
        fresh = [
            view
            for view in answers
            if view is not None and view.seen_ago is not None and asked - view.seen_ago > lapsed
        ]
        if not fresh:
            return
        view = min(fresh, key=lambda v: v.seen_ago or 0.0)
        routes, fences = dict(self.owners), dict(self.fences)
        for vm in vms:
            owner = view.owners.get(vm)
            if vm not in self.held or owner is None or owner == self.gateway_id:
                continue
            log.warning("cluster_deposed_while_cut_off", vm=vm, owner=owner, told_by=view.gateway)
            self.stats.deposed_by_peers += 1
            self._drop(vm, "another gateway owns the console now")
            fences.pop(vm, None)  # a peer's answer names the owner, not its lease
            address = view.live.get(owner)
            if address is not None:
                routes[vm] = (owner, address)
            else:
                routes.pop(vm, None)
        self._set_owners(routes, fences)

    async def _ask_one(self, gateway: str, advertise: str, vms: Sequence[str]) -> PeerView | None:
        """One peer's reading for `vms` (merged over as many questions as they need)."""
        assert self._ask_peer is not None
        views: list[PeerView] = []
        try:
            async with asyncio.timeout(self.store.timeout):
                for group in peerview.questions(vms):
                    views.append(await self._ask_peer(advertise, group))
        except (PeerLinkError, TimeoutError) as exc:
            _reraise_cancellation()
            self.link_failed(gateway)
            now = asyncio.get_running_loop().time()
            if now - self._peer_error_logged >= ERROR_LOG_INTERVAL:  # every round otherwise
                self._peer_error_logged = now
                log.warning("cluster_peer_not_asked", peer=gateway, error=str(exc) or "timeout")
            return None
        except Exception:  # a bug: it must not end the rounds, which keep the ports fenced
            log.exception("cluster_peer_question_failed", peer=gateway)
            return None
        owners = {vm: owner for view in views for vm, owner in view.owners.items()}
        ages = [v.seen_ago for v in views]
        oldest = None if None in ages else max(a for a in ages if a is not None)
        return PeerView(views[0].gateway, oldest, views[0].live, owners)

    def _note_owners(self, holders: Mapping[str, Lease | None], live: Mapping[str, str]) -> None:
        owners: dict[str, tuple[str, str]] = {}
        fences: dict[str, int] = {}
        for vm_id, lease in holders.items():
            if lease is None:
                continue
            if lease.gateway == self.gateway_id:
                if vm_id in self.held:
                    owners[vm_id] = (self.gateway_id, self.advertise)
            elif lease.gateway in live:
                owners[vm_id] = (lease.gateway, live[lease.gateway])
                fences[vm_id] = lease.token
        self.gateway_addresses = frozenset(
            address for advertised in live.values() if (address := _ip_of(advertised))
        )
        self._set_owners(owners, fences)

    def _note_ports(self, state: RoundState | None) -> None:
        """After a failed round: the owners as this round read them (`state`, None if it
        read nothing: the last round's), except that this gateway owns exactly the VMs
        whose ports it holds now."""
        if state is not None:
            self._note_owners(state.holders, state.live)
            return
        owners = {vm: at for vm, at in self.owners.items() if at[0] != self.gateway_id}
        self._set_owners(owners, {vm: f for vm, f in self.fences.items() if vm in owners})

    def _set_owners(self, owners: dict[str, tuple[str, str]], fences: dict[str, int]) -> None:
        """Route by `owners` (their leases' `fences`) from now on; sessions relayed to a VM
        that moved follow it."""
        for vm_id, token in self.held.items():
            owners[vm_id] = (self.gateway_id, self.advertise)
            fences[vm_id] = token
        before = self.owners
        self.owners, self.fences = owners, fences
        moved = [vm for vm, now in owners.items() if before.get(vm, ("",))[0] != now[0]]
        if moved:
            self.owner.owners_changed(moved)

    async def _carry_out(self, decisions: tuple[Decision, ...]) -> None:
        renew = {d.vm: d.token for d in decisions if isinstance(d, Renew)}
        releases = [d for d in decisions if isinstance(d, Release)]
        claims = {d.vm: d.floor for d in decisions if isinstance(d, Claim)}
        for d in decisions:
            if isinstance(d, Lost):
                log.warning("cluster_lease_lost", vm=d.vm, fence=d.token)
                self._drop(d.vm, "this gateway no longer owns the console")
        if releases:
            await self._hand_over(
                {d.vm: d.token for d in releases},
                {d.vm: _release_reason(d, leaving=self.leaving) for d in releases},
            )
        kept: dict[str, int] = {}
        if renew:
            # Redis extends the leases after this instant: they last at least a lease from it.
            sent = asyncio.get_running_loop().time()
            for vm_id, ok in (await self.store.renew_many(renew)).items():
                if ok:
                    kept[vm_id] = renew[vm_id]
                else:
                    log.warning("cluster_renew_refused", vm=vm_id, fence=renew[vm_id])
                    self._drop(vm_id, "this gateway no longer owns the console")
            self._lease_renewed(kept, sent + self.lease_ttl)
            for vm_id in kept:
                box = self.outboxes.get(vm_id)
                if box is not None and box.held is not None:
                    # Renewed by this round, which began after the output was held: the
                    # lease was ours all along, and the offsets are.
                    box.release()
            if any((box := self.outboxes.get(vm_id)) and box.chunks for vm_id in kept):
                # Output may wait for this very renewal: an append refused as "lapsed"
                # (Redis restarted empty since the last round) is not retried by itself.
                self._wake.set()
        if self._marks_owed:
            await self._reserve_again(kept)
        if claims:
            sent = asyncio.get_running_loop().time()
            granted = await self.store.claim_many(claims)
            for vm_id, token in granted.items():
                if token is not None:
                    await self._take(vm_id, token, sent + self.lease_ttl)
            if any(token is not None for token in granted.values()):
                await self._announce()

    async def _announce(self) -> None:
        """Tell the other gateways that leases changed hands here (best effort)."""
        try:
            await self.store.announce_owners()
        except ClusterUnavailableError as exc:
            _reraise_cancellation()
            log.info("cluster_announce_failed", error=str(exc))

    async def _reserve_again(self, held: Mapping[str, int]) -> None:
        """Redis lost the log's marks: put back ours, past every offset we handed out.

        Without them a successor (after this gateway dies) would start the log at
        0 again and hand out offsets our clients already hold. The same for a VM this
        gateway handed over lately: its clients hold offsets up to the hand-over, and
        the gateway that claims it next (maybe not yet) must start past them.
        """
        for vm_id, token in held.items():
            box = self.outboxes.get(vm_id)
            if box is not None:
                ahead = max(self.store.reserve_ahead, box.ahead)
                await self.store.reserve(vm_id, token, box.end + ahead)
        now = asyncio.get_running_loop().time()
        keep = HANDED_OVER_KEEP_LEASES * self.lease_ttl
        self._handed_over = {
            vm: (mark, at) for vm, (mark, at) in self._handed_over.items() if now - at < keep
        }
        floors = {vm: mark for vm, (mark, _) in self._handed_over.items() if vm not in held}
        await self.store.raise_floors(floors)
        self._marks_owed = False  # only now: a Redis error above leaves them owed
        log.info("cluster_offsets_reserved_again", vms=len(held), handed_over=len(floors))

    def _lease_renewed(self, vms: Iterable[str], expiry: float) -> None:
        """Our leases on `vms` last until `expiry` (loop time): their hubs write input until
        then, and hold it after (see `ConsoleHub.lease_expiry`)."""
        for vm_id in vms:
            hub = self._hubs.get(vm_id)
            if hub is not None:
                hub.lease_renewed(expiry)

    async def _take(self, vm_id: str, token: int, expiry: float) -> None:
        """A claim was granted (its lease lasts until `expiry`): start the hub from the
        shared log's tail."""
        vm = self.owner.configured_vms().get(vm_id)
        if vm is None:
            await self.store.release(vm_id, token)
            return
        try:
            start, end = await self.store.bounds(vm_id)
            # Past anything a previous owner may have handed out unstored (see resume_point).
            point = await self.store.resume_point(vm_id)
        except ValueError as exc:
            # Marks no gateway wrote (numbers are all the scripts write): no offset is safe
            # to start at. Let this VM go rather than raise out of the round, which would
            # end the node and every other console with it; an operator must mend the key.
            log.error("cluster_vm_log_unreadable", vm=vm_id, error=str(exc)[:200])
            await self.store.release(vm_id, token)
            return
        if not await self.store.reserve(vm_id, token, point + self.store.reserve_ahead):
            return  # taken from us already: the next round says so
        history: tuple[int, bytes] = (point, b"")
        if point == end and end > start:
            tail = await self.store.read(vm_id, max(start, end - self.ring_bytes), self.ring_bytes)
            if tail.offset + len(tail.data) == end:  # contiguous to the end: prefill the ring
                history = (tail.offset, tail.data)
        elif point > end:
            log.warning("cluster_vm_offsets_skipped", vm=vm_id, stored_end=end, resume_at=point)
        self.policy.claimed(vm_id, token)
        self._releasing.pop(vm_id, None)  # an old hand-over's lease and output are void now
        self._ports_closing.pop(vm_id, None)
        self.held[vm_id] = token
        self.stats.owner_changes += 1
        outbox = Outbox(
            vm_id,
            token,
            self.log_bytes,
            self._wake.set,
            start=point,
            stats=self.stats,
            stalled=self._stalled_now,
        )
        self.outboxes[vm_id] = outbox
        log.info("cluster_vm_claimed", vm=vm_id, fence=token, offset=end)
        hub = self.owner.open_hub(vm, history, outbox)
        hub.lease_renewed(expiry)
        self._hubs[vm_id] = hub
        outbox.publish = hub.publish

    async def _hand_over(self, vms: dict[str, int], reason: str | Mapping[str, str]) -> None:
        """Release VMs cleanly: stop their ports, ship their last output, settle, release.

        `reason` (one for all, or per VM) is what their sessions are told.

        Settling tells the next owner that every offset handed out is stored, so it
        continues right at the log's end instead of past this owner's reservation.

        Raises:
            ClusterUnavailableError: Redis did not answer (the leases then lapse).
        """
        self._begin_hand_over(vms, reason)
        await self._finish_releases()

    def _begin_hand_over(self, vms: Mapping[str, int], reason: str | Mapping[str, str]) -> None:
        """Close the VMs' ports and note what `_finish_releases` must still do."""
        for vm_id, token in vms.items():
            box = self.outboxes.get(vm_id)
            earlier = self._releasing.get(vm_id)
            if box is None and earlier is not None and earlier[0] == token:
                # Releasing a lease an earlier hand-over left (Redis failed): its port is
                # closed, its outbox is that hand-over's, still to ship. Keep it.
                box = earlier[1]
            self._releasing[vm_id] = (token, box)
            closing = self._drop(vm_id, reason if isinstance(reason, str) else reason[vm_id])
            if closing is not None:
                self._ports_closing[vm_id] = closing

    async def _finish_releases(self) -> None:
        """Ship, settle and release every VM whose hand-over began (see `_hand_over`).

        Also what an earlier hand-over left undone (Redis failed, or a stop cut the
        round short): its output is shipped now instead of being lost.
        """
        pending = dict(self._releasing)
        # The ports first: what they print until they are gone is ours to ship, and the
        # next owner may open them as soon as the leases are released.
        closing = [self._ports_closing.pop(vm) for vm in pending if vm in self._ports_closing]
        if closing:
            await asyncio.wait(closing, timeout=PORT_CLOSE_WAIT)
        unshipped = [box for _, box in pending.values() if box is not None]
        renewed: set[str] = set()
        while unshipped := [box for box in unshipped if box.chunks]:
            shipped = await self._ship(unshipped)
            # Lapsed while Redis was away, and nobody took the VM since: the lease is put
            # back (once) and the output goes, as a round would do for a VM it keeps.
            lapsed = {
                box.vm: box.token
                for box, result in shipped
                if result.status == "lapsed" and box.vm not in renewed
            }
            renewed |= set(lapsed)
            back = [vm for vm, ok in (await self.store.renew_many(lapsed)).items() if ok]
            if not back and not any(result.ok for _, result in shipped):
                # Refused (fenced, lapsed): what is left is not ours to store any more.
                for box, result in shipped:
                    self._not_stored(box, result.status)
                break
        for vm_id, (token, left) in pending.items():
            if left is not None and not left.chunks:
                settled = await self.store.settle(vm_id, token, left.end)
                if not settled and vm_id not in renewed:
                    # Lapsed as Redis stalled: put the lease back (only if nobody took the
                    # VM) and settle, or the next owner starts past our reservation.
                    renewed.add(vm_id)
                    if (await self.store.renew_many({vm_id: token}))[vm_id]:
                        await self.store.settle(vm_id, token, left.end)
        await self.store.release_many({vm_id: token for vm_id, (token, _) in pending.items()})
        now = asyncio.get_running_loop().time()
        for vm_id, (_, left) in pending.items():
            if left is not None:
                mark = left.end + max(self.store.reserve_ahead, left.ahead)
                self._handed_over[vm_id] = (mark, now)
        for vm_id, entry in pending.items():
            if self._releasing.get(vm_id) is entry:
                del self._releasing[vm_id]
        await self._announce()

    def _drop(self, vm_id: str, reason: str) -> asyncio.Future[None] | None:
        """Stop owning a VM here: port closed, sessions ended, output not shipped any more.

        Returns what finishes once the port is closed (`NodeOwner.close_hub`).
        """
        token = self.held.pop(vm_id, None)
        self.outboxes.pop(vm_id, None)
        self._hubs.pop(vm_id, None)
        if token is None:
            return None
        return self.owner.close_hub(vm_id, reason)

    # -- console output -----------------------------------------------------------------------

    async def _appender(self) -> None:
        """Ship buffered output as soon as it arrives: one pipelined round trip per batch."""
        delay = APPEND_RETRY_MIN
        while True:
            await self._wake.wait()
            # Gather what arrives within a few ms into one round trip: typing echoes a
            # byte at a time, and one script per echo cost the owner (and Redis) more
            # CPU than relaying the key. Well within the 100 ms the log may lag.
            await asyncio.sleep(APPEND_COALESCE)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                await self._append_once()
                delay = APPEND_RETRY_MIN
            except ClusterUnavailableError as exc:
                _reraise_cancellation()
                self._redis_failed("append", exc, asyncio.get_running_loop().time())
                await asyncio.sleep(delay)
                delay = min(APPEND_RETRY_MAX, delay * 2)
                self._wake.set()

    async def _ship(self, boxes: Sequence[Outbox]) -> list[tuple[Outbox, AppendResult]]:
        """Send outboxes' next contiguous runs in one round trip; forget what was stored.

        At most about `APPEND_ROUND_TRIP_BYTES` go at once, starting each time where
        the previous round trip stopped, so every VM's output gets its turn.
        """
        sent: list[Outbox] = []
        batches: list[Outgoing] = []
        size = 0
        first = self._ship_turn % len(boxes) if boxes else 0
        for box in itertools.chain(boxes[first:], boxes[:first]):
            if size >= APPEND_ROUND_TRIP_BYTES:
                break
            batch = box.batch()
            if batch is not None:
                sent.append(box)
                mark = box.mark(self._mark_horizon, self.store.reserve_ahead)
                batches.append(Outgoing(box.vm, box.token, batch[0], batch[1], mark))
                size += sum(map(len, batch[1]))
        self._ship_turn = first + len(sent)
        if not batches:
            return []
        results = await self.store.append_many(batches)
        for box, result in zip(sent, results, strict=True):
            if result.ok:
                box.stored(result.end)
                self.stats.appended_bytes += result.written
        return list(zip(sent, results, strict=True))

    async def _append_once(self) -> None:
        for box, result in await self._ship(list(self.outboxes.values())):
            if self.outboxes.get(box.vm) is not box:
                continue  # dropped meanwhile
            if result.ok:
                if box.chunks:
                    self._wake.set()
            elif result.status == "fenced":
                self.stats.fenced_appends += 1
                log.warning("cluster_append_fenced", vm=box.vm, fence=box.token)
                self._drop(box.vm, "this gateway no longer owns the console")
            # "lapsed": the next round re-creates the lease and wakes us (`_carry_out`).

    # -- switches -----------------------------------------------------------------------------

    def _on_switch(self, event: SwitchEvent) -> None:
        if isinstance(event, SwitchChange):
            level = self.switches.setdefault(event.level, {})
            times = self.switch_times.setdefault(event.level, {})
            changed = level.get(event.key) is not event.enabled
            if not changed and times.get(event.key, 0) == event.at:
                return  # a repeat (anyone may PUBLISH): no file write, no walk over sessions
            level[event.key] = event.enabled
            times[event.key] = event.at
            self._back_up()
            if changed:
                self.owner.switches_changed(event)
        elif isinstance(event, SwitchesResync):
            self._resync.set()
        elif isinstance(event, OwnershipNews) and event.gateway != self.gateway_id:
            self._heard_news = True
            self._next_round_now.set()

    async def _resync_switches(self) -> None:
        """Re-read every override whenever the watcher (re)subscribes: changes may be missed.

        A read that fails is tried again (0.1 s doubling to 1 s) until one succeeds: the
        request is owed, whatever else fails meanwhile.
        """
        delay = APPEND_RETRY_MIN
        while True:
            await self._resync.wait()
            self._resync.clear()
            if self._stopping.is_set():
                return
            try:
                await self.load_switches()
            except ClusterUnavailableError as exc:
                _reraise_cancellation()
                self._redis_failed("all_switches", exc, asyncio.get_running_loop().time())
                await asyncio.sleep(delay)
                delay = min(APPEND_RETRY_MAX, delay * 2)
                self._resync.set()
                continue
            delay = APPEND_RETRY_MIN
            self.owner.switches_changed()


def _ip_of(advertise: str) -> str | None:
    """The IP address of an advertised `host:port` (`[v6]:port`); None for a host name."""
    host = advertise.rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


__all__ = ["ClusterNode", "NodeOwner", "NodeStats", "Nothing", "Outbox"]
