"""Console-output integrity under chaos: real processes, a seeded fault schedule, a checker.

    .venv/bin/python -m bench.chaos --seconds 600 --seed 7 [--fast-rate 300000]

The region is tests/cluster/harness.py's (redis-server, three `relayd serve`,
HAProxy, one-client serial ends). Every VM prints self-describing records
(``@<vm> <seq> <payload>\\r\\n``, the payload a function of the sequence number),
some fast (hundreds of kB/s), some slow. Spectators attach through HAProxy and
straight to a gateway and, after every disconnect, come back with ``?from=`` their
last offset; a reader polls ``/console-log`` on every gateway. Meanwhile a seeded
schedule kills (-9), freezes (SIGSTOP past lease_ttl), stops cleanly (SIGTERM)
and restarts gateways, stops and starts Redis, pauses it (CLIENT PAUSE < 1 s)
and restarts it empty.

`Checker` is the contract, seen from outside (shared/DESIGN.md, docs/protocol.md
"Offsets", issue 16 point 5):

- every byte any client got (hello replay, binary frames) and every byte any
  `/console-log` answer held is kept as (vm, offset) -> byte: two different
  bytes at one offset, anywhere, is a violation;
- a byte shown to a client at an offset announced to that client as a gap
  (`output_gap`, or a hello that starts past `?from=`) is a violation;
- each client's stream (across reconnects) carries strictly increasing
  sequence numbers (no duplicate, no reordering) and whole records; a missing
  record, or a torn one, is allowed only across a gap the server announced, or
  where the VM printed it while no gateway was reading the port (the serial
  end records, per record, which of its connections it went to: a record
  written to a connection that later ended, or to none, may be lost).

Faults run one at a time: each is undone and the region has recovered (every
port held, every gateway ready; after an empty Redis, every gateway has put its
offset reservations back) before the next. That keeps the run out of the
combinations docs/operations.md names as limits (an owner dying while Redis is
unreachable may have its unstored offsets reused). `--overlap` runs pairs of faults at
once instead (`OVERLAPS`: two gateways killed, frozen or stopped together, a gateway
fault during a Redis pause, a clean restart during an empty Redis's recovery), every
pair the failure model does not name as a limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import random
import re
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cluster import start_region, stop_region  # noqa: E402
from tests.cluster.harness import LB, LEASE_TTL, Region  # noqa: E402
from tests.cluster.processes import (  # noqa: E402
    START_TIMEOUT,
    GatewayProcess,
    SerialEnd,
    poll_until,
)

RESULTS = ROOT / "bench" / "results"
LEASE_S = float(LEASE_TTL.rstrip("s"))
BLOCK = 1 << 16
MAX_BLOCKS = 512
"""Offsets kept per VM (32 MiB of bytes): older ones are forgotten (counted as unchecked);
clients resume near the end and the log holds 1 MiB, so a check that far back is rare."""
USERS = ("alice", "bob", "carol", "rita", "olga")
RECORD = re.compile(rb"@(vm-\d+) (\d{10}) ([a-z]*)\r\n")
RETRY_S = 0.1
"""Pause before a client connects again (pacing by the clock: the gateway may be down)."""
MAX_VIOLATIONS_KEPT = 200
EPOCH = [time.monotonic()]
"""When the current run began (times in reports count from here)."""


def payload(seq: int, fast: bool) -> bytes:
    """A record's payload: its length and letter follow from the sequence number alone."""
    letter = string.ascii_lowercase[seq % 26].encode()
    size = 1000 + (seq * 7919) % 3000 if fast else 10 + seq % 50
    return letter * size


def record(vm: str, seq: int, fast: bool) -> bytes:
    """One line the VM prints: ``@<vm> <seq> <payload>\\r\\n``."""
    return b"@%s %010d %s\r\n" % (vm.encode(), seq, payload(seq, fast))


class ByteMap:
    """(offset -> byte) for one VM, in blocks, with the first disagreement reported."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[bytearray, bytearray]] = {}
        self.floor = 0  # blocks below this were forgotten
        self.unchecked = 0

    def put(self, offset: int, data: bytes) -> tuple[int, int, int] | None:
        """Keep `data` at `offset`; return (offset, byte held, byte new) at a conflict."""
        conflict = None
        pos = 0
        while pos < len(data):
            block, i = divmod(offset + pos, BLOCK)
            n = min(BLOCK - i, len(data) - pos)
            piece = data[pos : pos + n]
            pos += n
            if block < self.floor:
                self.unchecked += n
                continue
            held = self.blocks.get(block)
            if held is None:
                held = self.blocks[block] = (bytearray(BLOCK), bytearray(BLOCK))
                self._evict()
            content, known = held
            mask = known[i : i + n]
            zeros = mask.count(0)
            if zeros < n and conflict is None:
                if zeros == 0:
                    if content[i : i + n] != piece:
                        j = next(j for j in range(n) if content[i + j] != piece[j])
                        conflict = (block * BLOCK + i + j, content[i + j], piece[j])
                else:
                    for j in range(n):
                        if mask[j] and content[i + j] != piece[j]:
                            conflict = (block * BLOCK + i + j, content[i + j], piece[j])
                            break
            if conflict is None:
                content[i : i + n] = piece
                known[i : i + n] = b"\x01" * n
        return conflict

    def around(self, offset: int, width: int = 24) -> bytes:
        """What is held near `offset` (for a violation's report)."""
        out = bytearray()
        for off in range(max(0, offset - width), offset + width):
            held = self.blocks.get(off // BLOCK)
            out += b"?" if held is None or not held[1][off % BLOCK] else held[0][off % BLOCK :][:1]
        return bytes(out)

    def _evict(self) -> None:
        while len(self.blocks) > MAX_BLOCKS:
            oldest = min(self.blocks)
            del self.blocks[oldest]
            self.floor = max(self.floor, oldest + 1)


@dataclass
class VmSpec:
    """One printing VM: how fast, and where each record went at the serial end."""

    vm: str
    fast: bool
    rate: float  # bytes per second
    next_seq: int = 0
    # seq -> the serial end's connection number it was written to (None: nobody served)
    serve_of: dict[int, int | None] = field(default_factory=dict)
    dropped: int = 0


@dataclass
class StreamState:
    """What the checker knows of one record stream (a client across reconnects, or a body)."""

    name: str
    vm: str
    # The harness's users may all read sub-1's consoles; spreading the clients over them
    # keeps each under max_sessions_per_principal (10 per gateway, relayed ones counted too).
    user: str = "rita"
    position: int | None = None
    last_seq: int = -1
    pending: bytearray = field(default_factory=bytearray)
    pending_at: int = 0  # the offset of pending[0]
    after_break: bool = True  # the next bytes may begin mid-record
    gaps: list[tuple[int, int]] = field(default_factory=list)  # announced [first, last]
    records: int = 0
    reconnects: int = 0
    gap_notices: int = 0
    history: list[str] = field(default_factory=list)  # recent hellos and notices (reports)

    def note(self, what: str) -> None:
        """Keep `what` among the stream's last events, for a violation's report."""
        self.history.append(f"{time.monotonic() - EPOCH[0]:.2f} {what}")
        del self.history[:-12]


class Checker:
    """Holds every byte seen per (vm, offset) and each stream's record order (module doc)."""

    def __init__(self, specs: dict[str, VmSpec]) -> None:
        self.specs = specs
        self.maps = {vm: ByteMap() for vm in specs}
        self.violations: list[dict[str, Any]] = []
        self.violation_count = 0
        self.started = EPOCH[0] = time.monotonic()
        self.bytes_checked = 0
        self.lost_records_allowed = 0
        self.progress = asyncio.Event()  # set whenever a stream gets a record
        # vm -> record start offset -> (seq, the stream that first showed it), for reports
        self.starts: dict[str, dict[int, tuple[int, str]]] = {vm: {} for vm in specs}

    def violation(self, kind: str, stream: str, vm: str, **detail: Any) -> None:
        """Note one violation (the first `MAX_VIOLATIONS_KEPT` are kept in full)."""
        self.violation_count += 1
        if len(self.violations) < MAX_VIOLATIONS_KEPT:
            at = round(time.monotonic() - self.started, 2)
            self.violations.append({"t": at, "kind": kind, "stream": stream, "vm": vm, **detail})
            if "offset" in detail:
                self.violations[-1]["records_near"] = self._near(vm, int(detail["offset"]))

    def _near(self, vm: str, offset: int) -> list[tuple[int, int, str]]:
        """The records seen starting within 8 kB of `offset`: (offset, seq, first shown to)."""
        starts = self.starts[vm]
        return sorted((o, *starts[o]) for o in starts if abs(o - offset) < 8192)[:12]

    # -- bytes at offsets ---------------------------------------------------------------------

    def bytes_at(self, stream: StreamState, offset: int, data: bytes) -> None:
        """`stream` was shown `data` at `offset`."""
        self.bytes_checked += len(data)
        for first, last in stream.gaps:
            if offset <= last and offset + len(data) > first:
                self.violation(
                    "byte_in_announced_gap",
                    stream.name,
                    stream.vm,
                    offset=offset,
                    gap=[first, last],
                )
                break
        bytemap = self.maps[stream.vm]
        conflict = bytemap.put(offset, data)
        if conflict is not None:
            where, held, new = conflict
            self.violation(
                "two_bytes_at_one_offset",
                stream.name,
                stream.vm,
                history=list(stream.history),
                offset=where,
                held=chr(held),
                new=chr(new),
                held_around=bytemap.around(where).decode(errors="replace"),
                new_around=data[max(0, where - offset - 24) : where - offset + 24].decode(
                    errors="replace"
                ),
            )

    # -- a client's stream --------------------------------------------------------------------

    def hello(self, stream: StreamState, hello: dict[str, Any], asked: int | None) -> None:
        """A (re)connect's hello: where its bytes start, against `?from=` asked."""
        start = int(hello["offset"]) - int(hello["replay"])
        stream.note(f"hello from={asked} start={start} offset={hello['offset']}")
        if asked is not None:
            stream.reconnects += 1
            if start < asked:
                self.violation(
                    "hello_before_from", stream.name, stream.vm, asked=asked, start=start
                )
            elif start > asked:
                self._gap(stream, asked, start - 1)
        if asked is None or start != asked:
            self._break(stream, start)

    def output_gap(self, stream: StreamState, first: int, last: int) -> None:
        """An `output_gap` notice: [first, last] will not come."""
        stream.gap_notices += 1
        stream.note(f"output_gap {first}..{last} at {stream.position}")
        if stream.position is not None and first > stream.position:
            self.violation(
                "gap_not_announced",
                stream.name,
                stream.vm,
                position=stream.position,
                notice=[first, last],
            )
        self._gap(stream, first, last)
        if stream.position is None or last + 1 > stream.position:
            self._break(stream, last + 1)

    def _gap(self, stream: StreamState, first: int, last: int) -> None:
        stream.gaps.append((first, last))
        del stream.gaps[:-64]  # the recent ones: a stream moves forward

    def _break(self, stream: StreamState, position: int) -> None:
        stream.position = position
        stream.pending.clear()
        stream.pending_at = position
        stream.after_break = True

    def output(self, stream: StreamState, data: bytes) -> None:
        """Binary output for `stream` at its position."""
        assert stream.position is not None
        self.bytes_at(stream, stream.position, data)
        stream.position += len(data)
        stream.pending += data
        self._records(stream, final=False)

    def body(self, name: str, vm: str, offset: int, data: bytes) -> None:
        """A `/console-log` answer: `data` at `offset` (contiguous, records checked too)."""
        stream = StreamState(name, vm, position=offset, pending_at=offset)
        self.output(stream, data)

    def _records(self, stream: StreamState, *, final: bool) -> None:
        spec = self.specs[stream.vm]
        buf = stream.pending
        cursor = 0
        for match in RECORD.finditer(buf):
            fragment = bytes(buf[cursor : match.start()])
            seq = int(match.group(2))
            if match.group(1).decode() != stream.vm or match.group(3) != payload(seq, spec.fast):
                self.violation(
                    "corrupt_record",
                    stream.name,
                    stream.vm,
                    offset=stream.pending_at + match.start(),
                    seq=seq,
                )
            at = stream.pending_at + match.start()
            starts = self.starts[stream.vm]
            if len(starts) > 200_000:  # for reports only: keep memory bounded in a soak
                starts.clear()
            starts.setdefault(at, (seq, stream.name))
            self._next(stream, seq, fragment, at)
            cursor = match.end()
        del buf[:cursor]
        stream.pending_at += cursor
        if len(buf) > 1 << 16:  # no record is that long: garbage, say so once
            self.violation(
                "unparsable_output", stream.name, stream.vm, offset=stream.pending_at, size=len(buf)
            )
            stream.pending_at += len(buf)
            buf.clear()
            stream.after_break = True

    def _next(self, stream: StreamState, seq: int, fragment: bytes, offset: int) -> None:
        """Record `seq` follows `fragment` (unparsed bytes) in a stream with no break."""
        spec = self.specs[stream.vm]
        last = stream.last_seq
        if seq <= last:
            self.violation(
                "sequence_not_increasing", stream.name, stream.vm, offset=offset, seq=seq, last=last
            )
        elif not stream.after_break:
            missing = range(last + 1, seq)
            # A torn record is the start of the one after `last`, which must then be lost.
            if fragment and (
                not missing or not record(stream.vm, last + 1, spec.fast).startswith(fragment)
            ):
                self.violation(
                    "foreign_bytes", stream.name, stream.vm, offset=offset, fragment=fragment[:40]
                )
            # Lost on the way in is allowed: printed while no gateway read the port (None),
            # or written to a connection of the serial end other than the one `seq` came on
            # (it ended with them unread). Lost from a connection that went on is not.
            serve = spec.serve_of.get(seq)
            kept_on_line = [n for n in missing if spec.serve_of.get(n, serve) == serve]
            if kept_on_line:
                self.violation(
                    "records_lost",
                    stream.name,
                    stream.vm,
                    history=list(stream.history),
                    offset=offset,
                    after=last,
                    seq=seq,
                    lost_on_live_connection=len(kept_on_line),
                )
            elif missing:
                self.lost_records_allowed += len(missing)
        stream.after_break = False
        stream.last_seq = max(last, seq)
        stream.records += 1
        self.progress.set()


# -- load -------------------------------------------------------------------------------------


async def print_steadily(spec: VmSpec, end: SerialEnd, stop: asyncio.Event) -> None:
    """The VM prints at `spec.rate`, paced by the clock (a load shape, not synchronization)."""
    loop = asyncio.get_running_loop()
    tick = 0.01 if spec.fast else 0.05
    started, sent = loop.time(), 0.0
    while not stop.is_set():
        due = (loop.time() - started) * spec.rate
        out = []
        while sent < due:
            seq = spec.next_seq
            spec.next_seq += 1
            line = record(spec.vm, seq, spec.fast)
            out.append((seq, line))
            sent += len(line)
        for seq, line in out:
            if end.emit(line):  # to the connection being served: the `serves`-th
                spec.serve_of[seq] = end.serves
            else:
                spec.serve_of[seq] = None
                spec.dropped += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(tick):
                await stop.wait()


async def follow(
    region: Region,
    checker: Checker,
    stream: StreamState,
    choose: Callable[[], Any],
    stop: asyncio.Event,
    stats: dict[str, int],
) -> None:
    """A spectator that reconnects with ``?from=`` its position after every disconnect."""
    while not stop.is_set():
        asked = stream.position
        query = "mode=spectate" + (f"&from={asked}" if asked is not None else "")
        try:
            target = choose()
            stream.note(f"connect {getattr(target, 'gateway_id', target)}")
            async with region.console(target, stream.vm, user=stream.user, query=query) as console:
                stats["connects"] += 1
                checker.hello(stream, console.hello, asked)
                while True:
                    receiving = asyncio.ensure_future(console.ws.recv())
                    stopping = asyncio.ensure_future(stop.wait())
                    done, _ = await asyncio.wait(
                        {receiving, stopping}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if receiving not in done:
                        receiving.cancel()
                        return
                    stopping.cancel()
                    message = receiving.result()
                    if isinstance(message, bytes):
                        checker.output(stream, message)
                    else:
                        control = json.loads(message)
                        if control.get("type") == "notice":
                            stream.note(f"{control.get('event')} at {stream.position}")
                        if control.get("event") == "output_gap":
                            checker.output_gap(stream, int(control["first"]), int(control["last"]))
        except (ConnectionClosed, InvalidHandshake, InvalidStatus, OSError, TimeoutError) as exc:
            stats["disconnects"] += 1
            reason = f"ended:{type(exc).__name__}"
            if isinstance(exc, InvalidStatus):
                reason = f"refused:{exc.response.status_code}"
                with contextlib.suppress(ValueError, AttributeError):
                    reason += f":{json.loads(exc.response.body or b'{}').get('error')}"
            elif isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
                reason = f"closed:{exc.rcvd.code}"
            stats[reason] = stats.get(reason, 0) + 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RETRY_S):
                await stop.wait()


async def read_logs(
    region: Region, checker: Checker, rng: random.Random, stop: asyncio.Event, stats: dict[str, int]
) -> None:
    """Poll `/console-log` on every gateway and HAProxy: random windows, near the end mostly."""
    vms = sorted(checker.specs)
    while not stop.is_set():
        vm = rng.choice(vms)
        target: Any = rng.choice([LB, *[g for g in region.gateways if g.running()]])
        await read_log_once(region, checker, target, vm, rng, stats)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):  # the reader's pace, by the clock
                await stop.wait()


async def read_log_once(
    region: Region,
    checker: Checker,
    target: Any,
    vm: str,
    rng: random.Random | None,
    stats: dict[str, int],
    *,
    whole: bool = False,
) -> int | None:
    """One `/console-log` read; returns the log's end (None: no answer)."""
    try:
        async with asyncio.timeout(5):  # a frozen gateway never answers
            status, headers, body = await region.request(
                target, "GET", f"/v1/vms/{vm}/console-log", user="rita"
            )
            if status != 200:
                return None
            start, end = int(headers["relayd-log-start"]), int(headers["relayd-log-end"])
            if not whole and rng is not None and end > start:
                at = rng.randint(max(start, end - (1 << 20)), end)
                status, headers, body = await region.request(
                    target,
                    "GET",
                    f"/v1/vms/{vm}/console-log?from={at}&max_bytes={1 << 16}",
                    user="rita",
                )
                if status != 200:
                    return None
    except (OSError, TimeoutError, ValueError, KeyError, IndexError):
        return None
    offset = int(headers.get("relayd-data-offset", headers["relayd-log-start"]))
    name = f"log:{getattr(target, 'gateway_id', target)}"
    checker.body(name, vm, offset, body)
    stats["log_reads"] += 1
    return int(headers["relayd-log-end"])


# -- faults -------------------------------------------------------------------------------------

FAULTS = ("kill", "freeze", "term", "redis_stop", "redis_pause", "redis_empty")


async def recovered(region: Region, timeout: float = START_TIMEOUT) -> bool:  # noqa: ASYNC109
    """Every gateway and Redis run, and every VM's port is held by a running gateway."""
    try:
        async with asyncio.timeout(timeout):
            for end in region.ends.values():
                await region.cluster.wait_owner(end, timeout)
    except (TimeoutError, AssertionError):
        return False
    return True


async def fault(
    region: Region,
    kind: str,
    rng: random.Random,
    log: list[dict[str, Any]],
    busy: list[str],
    *,
    spare: set[str] | None = None,
    taken: set[str] | None = None,
    overlap: str | None = None,
    target: GatewayProcess | None = None,
) -> None:
    """Inflict one fault and undo it (the caller waits for recovery after).

    A gateway fault hits the owner of a `busy` (fast-printing) VM most of the time:
    that is where an owner has handed out the most offsets the log does not hold yet.
    `spare`: gateway ids not to hit (another fault of an overlap has them); `taken`
    gets the id of the gateway hit; `target`, if running and not spare, is the one hit.
    `redis_empty` waits for the re-reservations of the gateways that keep running
    throughout (not those in `spare`).
    """
    cluster = region.cluster
    spare = spare if spare is not None else set()
    running = [g for g in region.gateways if g.running() and g.gateway_id not in spare]
    gateway: GatewayProcess = rng.choice(running)
    owner = region.owner(rng.choice(busy)) if busy else None
    if owner is not None and owner in running and rng.random() < 0.7:
        gateway = owner
    if target is not None and target in running:
        gateway = target
    if kind in ("kill", "freeze", "term") and taken is not None:
        taken.add(gateway.gateway_id)
    entry: dict[str, Any] = {"t": None, "fault": kind}
    if overlap is not None:
        entry["overlap"] = overlap
    if kind in ("kill", "freeze", "term"):
        entry["gateway"] = gateway.gateway_id
    log.append(entry)
    entry["t"] = time.monotonic()
    if kind == "kill":
        gateway.kill()
        await gateway.wait_exit()
        await asyncio.sleep(rng.uniform(0.0, 2.0))  # how long it stays dead (a fault's shape)
        await gateway.start(cluster.python)
    elif kind == "freeze":
        gateway.freeze()
        await asyncio.sleep(LEASE_S + rng.uniform(0.5, 2.5))  # frozen past its lease
        gateway.thaw()
    elif kind == "term":
        await gateway.stop()
        await gateway.start(cluster.python)
    elif kind == "redis_stop":
        await cluster.redis.stop(keep_data=True)
        await asyncio.sleep(rng.uniform(0.5, 3.0))  # the outage's length
        await cluster.redis.start()
    elif kind == "redis_pause":
        ms = rng.randint(200, 900)
        entry["ms"] = ms
        await cluster.redis.command("CLIENT", "PAUSE", str(ms), rng.choice(["ALL", "WRITE"]))
    elif kind == "redis_empty":
        before = {g.gateway_id: len(g.events("cluster_offsets_reserved_again")) for g in running}
        await cluster.redis.restart_empty()
        # The contract (docs/operations.md, "Redis restarts empty") loses the log's history
        # and tickets, but every holder re-creates its lease and its offset reservation:
        # wait for those before the next fault, so a later kill is not the undocumented
        # window between the restart and the re-reservation. (A gateway an overlapping
        # fault hits meanwhile, in `spare`, is not waited for.)
        for g in running:

            async def reserved(g: GatewayProcess = g) -> bool:
                count = len(g.events("cluster_offsets_reserved_again"))
                return g.gateway_id in spare or count > before[g.gateway_id]

            with contextlib.suppress(TimeoutError, RuntimeError):
                await poll_until(reserved, g.gateway_id, START_TIMEOUT, g.running)


OVERLAPS: tuple[tuple[str, str], ...] = (
    ("kill", "kill"),
    ("kill", "freeze"),
    ("freeze", "kill"),
    ("freeze", "freeze"),
    ("kill", "term"),
    ("term", "kill"),
    ("term", "term"),
    ("freeze", "term"),
    ("term", "freeze"),
    ("redis_pause", "kill"),
    ("redis_pause", "freeze"),
    ("redis_pause", "term"),
    ("freeze", "redis_pause"),
    ("kill", "redis_pause"),
    ("redis_empty", "term"),
)
"""Pairs of faults `--overlap` runs at once, the second begun while the first is under way.

Left out are exactly the combinations docs/operations.md's failure model names as limits:
a gateway that dies, freezes past its lease or stops while Redis is unreachable (a
`redis_stop`: output it handed out past its mark may have its offsets reused), and a
holder that dies or freezes between an empty Redis and its re-reservation (its VMs
start their offsets again, with an `offsets_reused` notice the checker does not take).
A clean stop (`term`) during that recovery is in: it ships and settles its mark. A
`redis_pause` is under a second, within a store call's deadline: Redis stays reachable."""


def overlap_delay(first: str, rng: random.Random) -> float:
    """How long after `first` begins the second fault begins: while `first` is under way."""
    if first == "freeze":
        return rng.uniform(0.0, LEASE_S + 0.5)  # frozen for LEASE_S + 0.5..2.5 s
    if first == "kill":
        return rng.uniform(0.0, 1.5)  # dead 0..2 s, then starting (about 1 s)
    if first == "redis_pause":
        return rng.uniform(0.0, 0.2)  # paused 200..900 ms
    return rng.uniform(0.0, 0.5)  # term (a 500 ms drain) and redis_empty (its recovery)


async def overlapping(
    region: Region,
    pair: tuple[str, str],
    rng: random.Random,
    log: list[dict[str, Any]],
    busy: list[str],
) -> None:
    """Two faults at once (`OVERLAPS`), on different gateways; both undone on return.

    When the first takes a gateway down past its lease and the second hits a gateway,
    half the time the second chases a busy VM of the first's: it hits the gateway that
    took the VM over, just after it took the port (its mark only `reserve_ahead` past
    its start, its clients already shown output there)."""
    first, second = pair
    hit: set[str] = set()
    delay = overlap_delay(first, rng)
    seeds = (rng.random(), rng.random())
    chase = (
        first in ("kill", "freeze")
        and second in ("kill", "freeze", "term")
        and bool(busy)
        and rng.random() < 0.5
    )
    soon = rng.uniform(0.0, 0.5)
    tag = f"{first}+{second}" + ("/chase" if chase else "")
    owners = {vm: region.owner(vm) for vm in busy}

    async def later() -> None:
        target = None
        if chase:  # the first fault has picked its gateway (it ran to its first await)
            mine = [vm for vm, g in owners.items() if g is not None and g.gateway_id in hit]
            if mine:
                # A killed gateway back within its lease may take its VM again itself:
                # then nobody took it over, and the second fault picks as usual.
                end = region.ends[mine[0]]
                with contextlib.suppress(TimeoutError, AssertionError):
                    target = await region.cluster.wait_owner(
                        end, 3 * LEASE_S, not_on=owners[mine[0]]
                    )
                    await asyncio.sleep(soon)  # how soon after the claim (the schedule's shape)
        else:
            await asyncio.sleep(delay)  # the schedule's shape: the second fault's start
        await fault(
            region,
            second,
            random.Random(seeds[1]),
            log,
            busy,
            spare=hit,
            taken=hit,
            overlap=tag,
            target=target,
        )

    # The first fault picks its gateway before the second starts (it runs until its first
    # await), so `hit` already names it.
    await asyncio.gather(
        fault(region, first, random.Random(seeds[0]), log, busy, spare=hit, taken=hit, overlap=tag),
        later(),
    )


async def restore(region: Region) -> None:
    """Redis and every gateway running again (after a fault that went wrong)."""
    if not region.cluster.redis.running():
        await region.cluster.redis.start()
    for gateway in region.gateways:
        gateway.thaw()
        if not gateway.running():
            with contextlib.suppress(Exception):
                await gateway.start(region.cluster.python)


async def chaos(
    region: Region,
    rng: random.Random,
    deadline: float,
    log: list[dict[str, Any]],
    stalls: list[dict[str, Any]],
    busy: list[str],
    kinds: tuple[str, ...] = FAULTS,
    overlaps: tuple[tuple[str, str], ...] = (),
) -> None:
    """Faults one after another until `deadline` (loop time): every kind once, then random.

    With `overlaps`, every pair of them once instead, then random pairs."""
    loop = asyncio.get_running_loop()
    every: list[str | tuple[str, str]] = list(overlaps or kinds)
    order = list(every)
    rng.shuffle(order)
    while loop.time() < deadline:
        kind = order.pop(0) if order else rng.choice(every)
        name = kind if isinstance(kind, str) else "+".join(kind)
        began, first = time.monotonic(), len(log)
        try:
            if isinstance(kind, str):
                await fault(region, kind, rng, log, busy)
            else:
                await overlapping(region, kind, rng, log, busy)
        except Exception as exc:  # a process that would not start: note it, bring all back
            stalls.append({"after": name, "error": repr(exc)[:300]})
            await restore(region)
        if not await recovered(region):
            stalls.append({"after": name, "t": log[-1]["t"]})
        elif len(log) > first:  # from the step's start until every port is held again
            log[first]["recovered_s"] = round(time.monotonic() - began, 2)
        await asyncio.sleep(rng.uniform(0.5, 3.0))  # quiet time between faults (the schedule)


# -- a run ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a run did and found."""

    seed: int
    seconds: float
    faults: list[dict[str, Any]]
    stalls: list[dict[str, Any]]
    violations: list[dict[str, Any]]
    violation_count: int
    stats: dict[str, Any]

    def summary(self) -> str:
        """A few lines for a terminal or a failed assertion."""
        counts: dict[str, int] = {}
        for f in self.faults:
            counts[f["fault"]] = counts.get(f["fault"], 0) + 1
        lines = [
            f"seed {self.seed}, {self.seconds:.0f} s, faults {counts}, stalls {len(self.stalls)}",
            f"stats {self.stats}",
            f"violations: {self.violation_count}",
        ]
        lines += [json.dumps(v) for v in self.violations[:20]]
        return "\n".join(lines)


async def run(
    region: Region,
    *,
    seconds: float,
    seed: int,
    fast_rate: float = 300_000,
    slow_rate: float = 2_000,
    fast_vms: int = 2,
    vms: int = 6,
    kinds: tuple[str, ...] = FAULTS,
    users: tuple[str, ...] = USERS,
    overlaps: tuple[tuple[str, str], ...] = (),
) -> Outcome:
    """Chaos on `region` for `seconds` (then a calm end: every client catches up)."""
    rng = random.Random(seed)
    names = sorted(region.ends)[:vms]
    specs = {
        vm: VmSpec(vm, i < fast_vms, fast_rate if i < fast_vms else slow_rate)
        for i, vm in enumerate(names)
    }
    checker = Checker(specs)
    stats: dict[str, int] = {"connects": 0, "disconnects": 0, "log_reads": 0}
    await recovered(region)
    stop_printing, stop_clients = asyncio.Event(), asyncio.Event()
    streams: list[StreamState] = []
    tasks: list[asyncio.Task[None]] = []
    for vm in names:
        tasks.append(asyncio.create_task(print_steadily(specs[vm], region.ends[vm], stop_printing)))
        lb = StreamState(f"{vm}/lb", vm, users[len(streams) % len(users)])
        direct = StreamState(f"{vm}/direct", vm, users[(len(streams) + 1) % len(users)])
        streams += [lb, direct]
        picker = random.Random(rng.random())
        tasks.append(
            asyncio.create_task(follow(region, checker, lb, lambda: LB, stop_clients, stats))
        )
        tasks.append(
            asyncio.create_task(
                follow(
                    region,
                    checker,
                    direct,
                    lambda p=picker: p.choice([g for g in region.gateways if g.running()]),
                    stop_clients,
                    stats,
                )
            )
        )
    tasks.append(
        asyncio.create_task(
            read_logs(region, checker, random.Random(rng.random()), stop_clients, stats)
        )
    )
    faults: list[dict[str, Any]] = []
    stalls: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        await chaos(region, rng, began + seconds, faults, stalls, names[:fast_vms], kinds, overlaps)
        # The calm end: everything up, the VMs print one last record each, every client
        # must get it (and so everything before it, or a gap it was told of).
        if not await recovered(region):
            stalls.append({"after": "end", "t": time.monotonic()})
        stop_printing.set()
        finals = {vm: spec.next_seq - 1 for vm, spec in specs.items()}
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not all(s.last_seq >= finals[s.vm] for s in streams):
                    checker.progress.clear()
                    await checker.progress.wait()
        except TimeoutError:
            behind = {
                s.name: (s.last_seq, finals[s.vm]) for s in streams if s.last_seq < finals[s.vm]
            }
            stalls.append({"after": "catch-up", "behind": behind})
        # The log, read whole through every gateway: one shared history.
        for vm in names:
            for gateway in region.gateways:
                await read_log_once(region, checker, gateway, vm, None, stats, whole=True)
    finally:
        stop_printing.set()
        stop_clients.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    for f in faults:
        f["t"] = round(f["t"] - (checker.started), 2)
    stats_out: dict[str, Any] = dict(stats)
    stats_out.update(
        bytes_checked=checker.bytes_checked,
        records=sum(s.records for s in streams),
        reconnects=sum(s.reconnects for s in streams),
        gap_notices=sum(s.gap_notices for s in streams),
        printed={vm: s.next_seq for vm, s in specs.items()},
        dropped_at_port={vm: s.dropped for vm, s in specs.items()},
        lost_records_allowed=checker.lost_records_allowed,
        unchecked_bytes=sum(m.unchecked for m in checker.maps.values()),
    )
    return Outcome(
        seed,
        loop.time() - began,
        faults,
        stalls,
        checker.violations,
        checker.violation_count,
        stats_out,
    )


async def main(args: argparse.Namespace) -> int:
    """Start a region per seed, run the chaos, write the outcome; exit 1 on a violation."""
    failed = False
    overlaps: tuple[tuple[str, str], ...] = ()
    if args.overlap is not None:  # given: the pairs named, or all of them
        named = {tuple(name.split("+")) for name in args.overlap}
        overlaps = tuple(pair for pair in OVERLAPS if not named or pair in named)
    for seed in args.seed:
        with tempfile.TemporaryDirectory(prefix="relayd-chaos-") as tmp:
            region = await start_region(Path(tmp))
            try:
                outcome = await run(
                    region,
                    seconds=args.seconds,
                    seed=seed,
                    fast_rate=args.fast_rate,
                    kinds=tuple(args.faults),
                    users=("rita",) if args.one_user else USERS,
                    overlaps=overlaps,
                )
            finally:
                await stop_region(region)
            RESULTS.mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            if overlaps:
                stamp += "-overlap"
            if outcome.violation_count or outcome.stalls:  # the gateways' logs, for the cause
                logs = RESULTS / f"chaos-{stamp}-seed{seed}-logs"
                logs.mkdir()
                for gateway in region.gateways:
                    shutil.copy(gateway.log_path, logs / f"{gateway.gateway_id}.log")
        path = RESULTS / f"chaos-{stamp}-seed{seed}.json"
        path.write_text(json.dumps(outcome.__dict__, indent=2, default=str))
        print(outcome.summary())
        print(f"written: {path}")
        failed = failed or outcome.violation_count > 0
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, nargs="+", default=[1])
    parser.add_argument("--fast-rate", type=float, default=300_000)
    parser.add_argument(
        "--one-user",
        action="store_true",
        help="every client as one user: over max_sessions_per_principal, refused (429) "
        "reconnects load the gateways",
    )
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument(
        "--overlap",
        nargs="*",
        choices=["+".join(pair) for pair in OVERLAPS],
        metavar="FIRST+SECOND",
        help="run pairs of faults at once instead of one at a time (OVERLAPS: those the "
        "failure model does not name as a limit; name some to run only those); --faults "
        "is then ignored",
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
